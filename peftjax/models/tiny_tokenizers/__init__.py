"""Small tokenizers packaged for the tiny text presets (one folder each); ``make.py`` builds them."""
