"""Stage 1, recipe: YAML text -> validated recipe builds (torch-free).

``yaml_source`` reads YAML with a 1-based position for every node; ``load`` applies ``--set``,
expands the matrix, renders templates (``templating``) and validates each build against the pydantic
models (``models``), whose closed vocabularies live in ``vocabulary``; ``schema`` exports the models
as JSON Schema. Entry point: :func:`lorarecipe.recipe.load.load_recipe`.
"""
