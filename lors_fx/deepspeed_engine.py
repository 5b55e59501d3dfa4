"""Former home of the DeepSpeed integration, kept so that old imports work: the code is in
:mod:`lors_fx.distributed.deepspeed`."""
from lors_fx.distributed.deepspeed import *  # noqa: F401,F403
from lors_fx.distributed.deepspeed import __all__  # noqa: F401
