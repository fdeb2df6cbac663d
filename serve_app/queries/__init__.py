"""Query logic beyond plain top-k: near-duplicate collapsing and duplicate groups (pure, no Ray)."""
