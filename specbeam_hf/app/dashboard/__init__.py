"""``specbeam dashboard``: watch speculative decoding iteration by iteration in a browser."""
