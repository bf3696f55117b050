"""Building blocks shared by every network: attention, rotary, grouped experts, dispatch, cross-entropy."""
