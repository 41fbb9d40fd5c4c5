"""The DeepSpeed glue: the only place in nvme_tier that names DeepSpeed's internals.

``version`` gates the supported releases; ``locators`` finds each state's tensors per optimizer
wrapper (and quiesces the engine); ``hooks`` routes and guards the engine's methods;
``config_block`` reads the engine's config; ``accelerator`` wraps device calls; ``aio_binding``
hides the async_io op's per-version binding; ``ops`` finds, builds and loads DeepSpeed's JIT ops.
Version differences are detected by feature (attribute presence), each commented with the
versions that need it. Inside this package ``import deepspeed`` is the real DeepSpeed (imports
are absolute).
"""
