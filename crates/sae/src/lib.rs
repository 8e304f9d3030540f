//! saelab-sae: sparse autoencoders and their trainer.
