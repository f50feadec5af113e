"""What a build writes and how it is described: file formats, not execution (torch-free unless noted).

``manifest`` (manifest.json and ``verify``), ``modelcard`` (README.md cards, sandboxed template),
``grid_image`` (labelled PNG grids), ``singlefile``/``singlefile_names`` (diffusers -> LDM/SGM
single-file layout; the tensor transforms import torch lazily), ``safetensors_meta`` (canonical
safetensors headers and provenance metadata).
"""
