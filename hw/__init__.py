"""SFx hardware in Amaranth HDL."""
