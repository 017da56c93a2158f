"""Helpers every page script uses; each module is small and typed, and none computes anything a
test could not call through the engine without Streamlit."""
