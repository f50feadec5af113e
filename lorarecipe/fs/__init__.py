"""Files on disk: where lorarecipe may read and write (``paths``), crash-safe writes (``atomic``),
content hashes (``hashing``) and the local Hugging Face cache (``hubcache``). Torch-free."""
