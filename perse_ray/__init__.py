"""perse-ray."""
