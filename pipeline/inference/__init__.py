"""What runs a trained tokenizer: evaluation (evaluate, quality, video_features, frechet,
contact_sheet) and token export (tokenize, token_files, mp4), with the export, precision and
command-line helpers they share."""
