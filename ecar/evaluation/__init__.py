"""Sample quality metrics: FID, precision/recall, classifier scores."""
