"""Recipes: the YAML files that describe a run, their schema, loading (`base:`, `--set`) and resolution.

`load_recipe(path, overrides)` reads and validates a recipe; `resolve(recipe)` builds its task, sleep config and
model config and cross-checks them. Both raise `RecipeError`, whose message is one line naming the file, the key
and the fix.
"""

from retrofit.recipes.loader import LoadedRecipe, RecipeError, dump_recipe, load_recipe, short_key_names
from retrofit.recipes.resolve import ResolvedRecipe, ResolvedStage, resolve
from retrofit.recipes.schema import Recipe

__all__ = [
    "LoadedRecipe",
    "Recipe",
    "RecipeError",
    "ResolvedRecipe",
    "ResolvedStage",
    "dump_recipe",
    "load_recipe",
    "resolve",
    "short_key_names",
]
