"""Floor 2: model definitions, checkpoint loaders, VAE/text encoders, flow-matching math, the toy world."""
