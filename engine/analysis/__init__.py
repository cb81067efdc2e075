"""The library side of the analysis commands (`engine.evaluate`, `engine.sample`'s latent
subcommands, `engine.plot`, `engine.anomaly`): ELBO/IWAE/active units and VQ statistics
(`evaluation`), anomaly scores and ROC-AUC (`anomaly`), latent grids, traversals and
interpolation (`latent`), plots (`plots`) and the grid/tensor writers (`outputs`)."""
