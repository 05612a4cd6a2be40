"""Stage statistics: what each stage reports, and the figures control and `pipeline status` compute from them."""
