"""Model configurations, one file per family, with Hugging Face's field names and defaults.

    common.py   what they share: checks, `config.json` reading, infinity in JSON, harmless keys, `hf_config_dict`
    mamba2.py   `Mamba2Config` (HF `Mamba2Config`)
    mamba1.py   `MambaConfig` (HF `MambaConfig`)
    zamba2.py   `Zamba2Config` (HF `Zamba2Config`), with the parts' settings records of parts.py

`easymamba.models.config_from_hf` reads a `config.json` with the config class its family names.
"""

from easymamba.config.common import hf_config_dict
from easymamba.config.mamba1 import MambaConfig
from easymamba.config.mamba2 import Mamba2Config
from easymamba.config.zamba2 import Zamba2Config

__all__ = ["Mamba2Config", "MambaConfig", "Zamba2Config", "hf_config_dict"]
