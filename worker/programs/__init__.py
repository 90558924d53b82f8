"""Programs as handlers: one run per message, and the files a run exchanges with its worker."""
