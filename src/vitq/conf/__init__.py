"""Recipe YAML files (the Hydra group `quant`), shipped with the package so plain Python reads them too."""
