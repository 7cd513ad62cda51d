package engine

// ReportsPeriodForTest exposes reportsPeriod to the external tests.
var ReportsPeriodForTest = reportsPeriod
