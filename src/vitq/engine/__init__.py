"""Lightning stages and the Hydra-facing run function (imports Lightning; vitq.quant does not)."""
