"""The state pytree, the shard_map'd steps, the one loop and its hooks, and the Trainer.

Named `training`, not `train`, so that `jaxdml.train(config, workdir)` can be the
package's entry function without a submodule shadowing it (docs/architecture.md).
"""
