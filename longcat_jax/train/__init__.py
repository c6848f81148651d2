"""Training: losses, the compute-budget controller, the optimizer, the step, checkpoints, growth.

    from longcat_jax import train
    config = train.get_train_config("tiny")
    model = longcat_jax.LongcatForCausalLM(config.model)
    state = train.init_train_state(model, config, jax.random.PRNGKey(config.seed))
    step = jax.jit(train.make_train_step(model, config))
    state, metrics = step(state, batch)          # batch: longcat_jax.data.make_train_iterator(...)

The whole job (data, checkpoints, metrics, resume, sample) is `experiments/train.py`.
"""

from longcat_jax.train.config import get_train_config, validate
from longcat_jax.train.step import (TrainState, abstract_train_state, init_train_state, make_eval_step,
                                    make_optimizer, make_train_step, state_from_params)

__all__ = ["get_train_config", "validate", "TrainState", "abstract_train_state", "init_train_state",
           "make_eval_step", "make_optimizer", "make_train_step", "state_from_params"]
