"""Model weights: the registry of models (``registry``), the per-user cache (``cache``), resumable checked
downloads (``download``), our safetensors model file format (``modelfile``) and ``hsam models`` (``cli``).

Importing this package, ``cache``, ``download``, ``registry`` or ``cli`` never imports torch; ``modelfile``
imports torch only inside the functions that load or save tensors.
"""
