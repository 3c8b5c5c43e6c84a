"""BabyLM's (Super)GLUE fine-tuning: the tasks, the head, the recipe, the command."""
