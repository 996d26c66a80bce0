"""The job queue: one worker per device runs generations one at a time, in order."""
