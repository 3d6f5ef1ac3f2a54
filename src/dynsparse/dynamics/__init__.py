"""Training dynamics of tree FF layers: routing reports over training, the auto-pruning study,
and static conversion of a trained model's trees."""
