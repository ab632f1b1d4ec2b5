"""The daemon: API server, supervisor, scheduler, metrics and the wiring of them to the engine
(main). Nothing here runs CRIU or writes the repository; the engine does."""
