"""pytest plugin: race tests as ordinary async tests explored under the controlled runtime."""
