# Makes the repository root importable for tests (models/, data/, methods/, core/).
