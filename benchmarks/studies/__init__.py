"""The studies behind benchmarks/RESULTS.md: each reproduces figures there. The product
(`tiergate bench`, `plan`, `eval`) lives one level up and imports nothing from here."""
