"""Everything that reads argv or Hydra: the train, spectra and export commands."""
