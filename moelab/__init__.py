"""moelab: mixture-of-experts models with any gating function."""
