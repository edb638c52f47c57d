"""mmref.client."""
