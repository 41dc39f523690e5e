from ._config import get_config, set_config
from ._validate import check_inputs
