"""The test suite. A regular package, so that processes the tests spawn import our `tests`, not the top-level
`tests` package a dependency (torch-fidelity) installs into site-packages."""
