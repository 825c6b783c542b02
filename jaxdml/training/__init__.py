"""The state pytree, the shard_map'd step and the loop.

Named `training` (DESIGN.md said `train/`) so that `jaxdml.train(config, workdir)`
can be the package's entry function without a submodule shadowing it.
"""
