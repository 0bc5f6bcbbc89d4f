"""What the notebooks use beside the method: interactive views (``explore``), the prompt widget
(``widgets``), example inputs (``examples``) and the Colab install cell (``colab``). The method
never imports this package."""
