"""``flushgate doctor``: find the hop that holds a token stream back, from measured arrival times."""
