"""Hydra configs of lightning-blogs-train (a package so that Hydra finds them in any install)."""
