"""PyTorch / nnU-Net checkpoint import and export (`jaxmamba convert-torch`)."""
