"""cocotb benches and the co-simulation harness."""
