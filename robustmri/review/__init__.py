"""Label review for annotation projects: review orders by name, and scoring labelled images (used by the MONAI
Label app)."""
