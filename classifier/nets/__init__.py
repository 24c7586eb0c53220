"""The networks: simple_cnn, timm models, metadata fusion, the ensemble network, and the losses that train them."""
