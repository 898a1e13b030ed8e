"""Model configurations, one file per family, with Hugging Face's field names and defaults.

    common.py   what they share: checks, `config.json` reading, infinity in JSON, harmless keys, `hf_config_dict`
    mamba2.py   `Mamba2Config` (HF `Mamba2Config`)
    mamba1.py   `MambaConfig` (HF `MambaConfig`)
    nemotron_h.py  `NemotronHConfig` (HF `NemotronHConfig`, Nemotron-H)
    falcon_h1.py   `FalconH1Config` (HF `FalconH1Config`)
    bamba.py    `BambaConfig` (HF `BambaConfig`, Mamba-2 + attention hybrid)
    granitemoehybrid.py   `GraniteMoeHybridConfig` (HF `GraniteMoeHybridConfig`, Granite-4.0-H)
    parts.py    the settings of one layer part (Mamba-2 mixer, attention, MLP, MoE) that hybrid configs derive
    rope.py     reading rotary-embedding settings (`rope_parameters` or the 4.x keys)
    falcon_mamba.py   `FalconMambaConfig` (HF `FalconMambaConfig`): Mamba-1's fields and `mixer_rms_eps`
    jamba.py    `JambaConfig` (HF `JambaConfig`, Mamba-1 + attention + MoE hybrid)
    zamba2.py   `Zamba2Config` (HF `Zamba2Config`), with the parts' settings records of parts.py

`easymamba.models.config_from_hf` reads a `config.json` with the config class its family names.
"""

from easymamba.config.bamba import BambaConfig
from easymamba.config.common import check_resource_bounds, hf_config_dict
from easymamba.config.falcon_h1 import FalconH1Config
from easymamba.config.granitemoehybrid import GraniteMoeHybridConfig
from easymamba.config.jamba import JambaConfig
from easymamba.config.falcon_mamba import FalconMambaConfig
from easymamba.config.mamba1 import MambaConfig
from easymamba.config.mamba2 import Mamba2Config
from easymamba.config.nemotron_h import NemotronHConfig
from easymamba.config.zamba2 import Zamba2Config

__all__ = ["Mamba2Config", "MambaConfig", "NemotronHConfig", "FalconH1Config", "BambaConfig",
           "GraniteMoeHybridConfig", "Zamba2Config", "FalconMambaConfig", "JambaConfig",
           "check_resource_bounds", "hf_config_dict"]
