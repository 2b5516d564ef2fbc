"""The tools beside the runtime, in the pip package only (never in the Slicer extension): demo, training,
synthetic CT, evaluation, the web app. They use ``AttentionUNetSegLib``; it never imports them."""
