"""PyTorch / nnU-Net checkpoint import and export (`jaxmamba convert-torch`:
`jaxmamba.cli.convert_torch`)."""
