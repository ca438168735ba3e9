"""Runtime: supervises every task, joins the stages with bounded queues, stops in order."""
