"""mmref.trainer."""
