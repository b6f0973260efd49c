"""RegMean++: block-by-block merging on the hidden states the merged model itself produces."""
