"""The layer every other imports and that imports none of them: train state, flat params."""
